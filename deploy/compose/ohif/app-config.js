/*
 * OHIF viewer configuration for the pacs-xai compose stack (mounted read-only at
 * /usr/share/nginx/pacs-xai/app-config.js in the ohif/app container; default.conf.template
 * beside this file serves it as /app-config.js).
 *
 * One data source: Orthanc's DICOMweb. The viewer's nginx proxies /dicom-web and /wado to
 * orthanc:8042 on the viewer's own origin, so the browser makes no cross-origin request
 * (Orthanc sends no CORS headers) and needs no Orthanc credentials (the proxy adds them).
 *
 * Open a study:  http://127.0.0.1:3000/viewer?StudyInstanceUIDs=<study uid>
 */
window.config = {
  routerBasename: '/',
  showStudyList: true,
  extensions: [],
  modes: [],
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  investigationalUseDialog: { option: 'never' },
  // No first-visit tour pop-up over the viewport.
  customizationService: { 'ohif.tours': { $set: [] } },
  // Open a SEG on its source at once, without the "Do you want to open this Segmentation?" dialog.
  disableConfirmationPrompts: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (pacs-xai compose stack)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        staticWado: false,
        omitQuotationForMultipartRequest: true,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
      },
    },
  ],
};
