/** @type {AppTypes.Config} */
// OHIF configuration owned by pacs-xai (`pacs-xai viewer`, service/tools/viewer/). It replaces the
// app-config.js of the OHIF build: one DICOMweb data source, the Orthanc behind the same nginx
// origin (/dicom-web and /wado are proxied to it), so there is no CORS and no external server.
window.config = {
  name: 'pacs-xai',
  routerBasename: null,
  extensions: [],
  modes: [],
  // No first-visit tour pop-up over the viewport.
  customizationService: { 'ohif.tours': { $set: [] } },
  // The "investigational use only" dialog; pacs-xai's own results carry "not for diagnostic use".
  investigationalUseDialog: { option: 'never' },
  // Open a SEG (and RTSTRUCT) on its source at once, without the "Do you want to open this
  // Segmentation?" dialog over the viewport.
  disableConfirmationPrompts: true,
  showStudyList: true,
  maxNumberOfWebWorkers: 3,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: true,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (pacs-xai viewer stack)',
        name: 'orthanc',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        wadoUriRoot: '/wado',
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        staticWado: false,
        singlepart: 'bulkdata,video',
        bulkDataURI: { enabled: true },
        omitQuotationForMultipartRequest: true,
      },
    },
  ],
};
